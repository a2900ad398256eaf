"""A minimal Django project served as WSGI: ``uvworker examples.django_app.wsgi:application``."""
