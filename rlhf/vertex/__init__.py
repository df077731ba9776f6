"""Vertex AI adapters the pipeline's last stages call: the Model Registry upload and the TensorBoard upload.
Outside the plain core: they import google-cloud-aiplatform."""
