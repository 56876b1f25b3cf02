# The pipeline image: Prefect worker, `loraflow serve` follower and CLI. On GPU hosts torch comes from
# the CUDA wheel and bitsandbytes is added for QLoRA.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/loraflow
COPY requirements/ requirements/
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} -r requirements/pipeline.txt bitsandbytes==0.50.2 \
    psycopg2-binary boto3
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
ENV LORAFLOW_PARAMS=deploy/compose/params.yaml PREFECT_SERVER_ANALYTICS_ENABLED=false
ENTRYPOINT ["loraflow"]
