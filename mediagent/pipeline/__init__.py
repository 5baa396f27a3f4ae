"""The DVC stages, one module each with ``main(params)``; dvc.yaml runs them in order."""
