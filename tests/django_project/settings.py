"""A minimal Django project for dj's task backend: PostgreSQL only, on the test database."""

import importlib.util
import os

import django
from psycopg.conninfo import conninfo_to_dict

# DJANGO_DATABASE_URL lets a test run dj without DJ_DATABASE_URL, so that dj reads Django's database.
_db = conninfo_to_dict(os.environ.get("DJANGO_DATABASE_URL") or os.environ["DJ_DATABASE_URL"])

SECRET_KEY = "dj-tests"
USE_TZ = True
TIME_ZONE = "UTC"
DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": _db["dbname"],
                         "USER": _db.get("user", ""), "PASSWORD": _db.get("password", ""),
                         "HOST": _db.get("host", ""), "PORT": _db.get("port", "")}}
INSTALLED_APPS = ["dj.contrib.django", "tests.django_project"]
if django.VERSION < (6,) and importlib.util.find_spec("django_tasks"):
    INSTALLED_APPS.append("django_tasks")
TASKS = {"default": {"BACKEND": "dj.contrib.django.Backend", "QUEUES": [],
                     "OPTIONS": {"MAX_ATTEMPTS": 2}}}
