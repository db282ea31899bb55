"""ASGI entry point: the whole site, for the dashboard's event stream (an async view that holds
no worker while a page is open), run as `gunicorn argus.asgi:application -k
uvicorn_worker.UvicornWorker` (Procfile); the WSGI server (argus/wsgi.py) serves everything else."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "argus.settings")
application = get_asgi_application()
