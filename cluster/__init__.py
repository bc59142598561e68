"""The ``tessera`` CLI, settings, the embedded local stack (Ray, S3, MLflow) and job submission."""
