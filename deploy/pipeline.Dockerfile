# The pipeline image: every loraflow service of docker-compose.yml (Prefect server and worker, MLflow
# server, the endpoint) runs `loraflow ...` from it, as `loraflow up` does on one machine. On GPU hosts torch
# comes from the CUDA wheel and bitsandbytes is added for QLoRA. .dockerignore keeps secrets (.env),
# environments, run state, data outputs and artifacts out of the build context.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/loraflow
COPY requirements/ requirements/
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} -r requirements/pipeline.txt bitsandbytes==0.50.2 boto3
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && git init -q && git add -A && \
    git -c user.name=loraflow -c user.email=loraflow@localhost commit -qm image
ENV LORAFLOW_PARAMS=deploy/compose/params.yaml PREFECT_SERVER_ANALYTICS_ENABLED=false
ENTRYPOINT ["loraflow"]
