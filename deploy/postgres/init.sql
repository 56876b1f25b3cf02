-- One PostgreSQL instance, one database per service (MLflow and Prefect never share tables).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
