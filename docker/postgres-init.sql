-- One Postgres for the stack: MLflow's database is created by the image (POSTGRES_DB), Prefect's here.
CREATE DATABASE prefect;
