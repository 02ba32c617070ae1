"""``multitask-nnunet serve``: the model behind an HTTP service (FastAPI + uvicorn, the serve extra) with a browser
viewer. command.py: the CLI; options.py: the limits; service.py: model, queue, worker, results; uploads.py: what
a request uploads; viewer.py: slices as PNG; app.py: the endpoints; static/index.html: the page."""
