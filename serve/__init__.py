"""The HTTP service around the predictor, the application behind ``seqops serve``.

``serve.app.create_app(settings)`` builds the FastAPI app (simple API, KServe v2, health,
metrics); ``serve.settings.ServeSettings`` holds what ``seqops serve``'s flags set;
``serve.run`` starts uvicorn. Nothing is imported here, so importing one module of the
service does not import the rest.
"""
