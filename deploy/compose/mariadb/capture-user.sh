# shellcheck shell=bash
# mariadb-bj (the master), first start of an empty data dir only: the `wmb` user the capturer
# connects as, with the minimal grants it needs.
#
# Sourced, not executed, by the mariadb image's docker-entrypoint.sh (it sources *.sh files that are
# not executable), so docker_process_sql and docker_sql_escape_string_literal come from there.  A
# shell script and not a .sql file because the password comes from the environment
# (WMB_MYSQL_PASSWORD, which docker-compose.yml fills from MYSQL_BJ_PASSWORD).
#
# Grants (checked by the capturer's preflight, which exits 3 when one is missing):
#   REPLICATION SLAVE   read the binlog (COM_BINLOG_DUMP)
#   REPLICATION CLIENT  SHOW BINARY LOGS / binlog status (BINLOG MONITOR on MariaDB >= 10.5)
#   SELECT on app.*     the captured schema
#   SELECT, INSERT, UPDATE, CREATE on wmb.*   the heartbeat row it upserts every second
: "${WMB_MYSQL_PASSWORD:?WMB_MYSQL_PASSWORD must be set (docker-compose.yml passes MYSQL_BJ_PASSWORD)}"
wmb_password_sql="$(docker_sql_escape_string_literal "${WMB_MYSQL_PASSWORD}")"
docker_process_sql <<EOSQL
SET SESSION sql_log_bin = 0;
CREATE USER IF NOT EXISTS 'wmb'@'%' IDENTIFIED BY '${wmb_password_sql}';
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'wmb'@'%';
GRANT SELECT ON app.* TO 'wmb'@'%';
GRANT SELECT, INSERT, UPDATE, CREATE ON wmb.* TO 'wmb'@'%';
EOSQL
unset wmb_password_sql
