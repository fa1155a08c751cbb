from django.apps import AppConfig


class DjConfig(AppConfig):
    """Only needed for `manage.py dj_work`; the backend works without it."""

    name = "dj.contrib.django"
    label = "dj"
    verbose_name = "dj job queue"
