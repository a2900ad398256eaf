from django.urls import path

from examples.django_app import views

urlpatterns = [
    path("", views.hello),
    path("echo", views.echo),
    path("upload", views.upload),
    path("stream", views.stream),
    path("file", views.source),
]
