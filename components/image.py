"""The one container image every component runs in on Vertex AI (built from the repo's Dockerfile)."""

import os

IMAGE = os.environ.get("RLHF_IMAGE", "us-docker.pkg.dev/rlhf-pipeline/rlhf/rlhf:0.1.0")
