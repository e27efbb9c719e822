#!/bin/sh
# Create (or update) the two work pools prefect.yaml deploys to, against $PREFECT_API_URL:
#   kubernetes-gpu  Kubernetes jobs from infra/work-pool-kubernetes.json (GPU pods on ECI)
#   local           processes on the machine running `prefect worker start --pool local`
set -eu
cd "$(dirname "$0")/.."
prefect work-pool create kubernetes-gpu --type kubernetes \
    --base-job-template infra/work-pool-kubernetes.json --overwrite
prefect work-pool create local --type process --overwrite
