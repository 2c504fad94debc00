# shellcheck shell=bash
# mariadb-gz (the read replica gzrep1), first start of an empty data dir only: the `wmb` user the
# applier (and the cache updater's after-replica wait) connects as.
#
# Sourced, not executed, by the mariadb image's docker-entrypoint.sh (it sources *.sh files that are
# not executable), so docker_process_sql and docker_sql_escape_string_literal come from there.  A
# shell script and not a .sql file because the password comes from the environment
# (WMB_MYSQL_PASSWORD, which docker-compose.yml fills from MYSQL_GZ_PASSWORD).
#
# Grants: ALL on the replicated schema (rows and DDL, since `ddl: apply`) and on wmb.* (its position,
# marker and conflict tables); nothing global.
: "${WMB_MYSQL_PASSWORD:?WMB_MYSQL_PASSWORD must be set (docker-compose.yml passes MYSQL_GZ_PASSWORD)}"
wmb_password_sql="$(docker_sql_escape_string_literal "${WMB_MYSQL_PASSWORD}")"
docker_process_sql <<EOSQL
SET SESSION sql_log_bin = 0;
CREATE USER IF NOT EXISTS 'wmb'@'%' IDENTIFIED BY '${wmb_password_sql}';
GRANT ALL PRIVILEGES ON app.* TO 'wmb'@'%';
GRANT ALL PRIVILEGES ON wmb.* TO 'wmb'@'%';
EOSQL
unset wmb_password_sql
