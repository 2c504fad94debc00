-- Run by the mariadb image on the first start of an empty data dir (docker-entrypoint-initdb.d).
-- Mounted into both mariadb-bj (master) and mariadb-gz (replica): the application schema of the
-- demo deployment (the tables of `wmb sandbox`), so both sides start with the same tables and the
-- applier keeps them in step from there.  sql_log_bin=0 keeps this setup out of the binlogs: the
-- capture must not ship a CREATE the replica already ran.
SET SESSION sql_log_bin = 0;

CREATE DATABASE IF NOT EXISTS app;
CREATE TABLE IF NOT EXISTS app.users (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  name VARCHAR(64) NOT NULL,
  email VARCHAR(128) NOT NULL,
  bio TEXT NULL,
  created_at DATETIME(6) NOT NULL
) CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS app.posts (
  id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  user_id BIGINT UNSIGNED NOT NULL,
  body VARCHAR(280) NOT NULL,
  likes INT NOT NULL DEFAULT 0,
  created_at DATETIME(6) NOT NULL,
  KEY (user_id)
) CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS app.follows (
  follower_id BIGINT UNSIGNED NOT NULL,
  followee_id BIGINT UNSIGNED NOT NULL,
  created_at DATETIME(6) NOT NULL,
  PRIMARY KEY (follower_id, followee_id)
) CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS app.counters (
  user_id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
  posts INT NOT NULL DEFAULT 0,
  followers INT NOT NULL DEFAULT 0,
  following INT NOT NULL DEFAULT 0
) CHARACTER SET utf8mb4;

-- wmb's own schema: the capturer's heartbeat row on the master (wmb.wmb_heartbeat), the applier's
-- position tables on the replica (wmb.wmb_apply_state ...); each daemon creates its tables itself.
CREATE DATABASE IF NOT EXISTS wmb;
