"""Settings of the example Django project: no database, no templates, just views."""

SECRET_KEY = "example-only-not-secret"  # an example: real projects read it from the environment
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]  # sets Content-Length on responses
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
TIME_ZONE = "UTC"  # Django sets the process time zone from this (log timestamps too)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2_621_440  # request.body (the echo view) refuses more than this
