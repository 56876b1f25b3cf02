-- One PostgreSQL instance, one database per service (MLflow and Prefect never share tables): the names
-- `loraflow up` / `loraflow service` derive from LORAFLOW_DATABASE_URL (.../loraflow -> loraflow_mlflow,
-- loraflow_prefect), which also creates them when missing. Prefect needs pg_trgm.
CREATE DATABASE loraflow_mlflow;
CREATE DATABASE loraflow_prefect;
\connect loraflow_prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
