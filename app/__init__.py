"""The HTTP service: FastAPI routes over the models in `model_store`."""
