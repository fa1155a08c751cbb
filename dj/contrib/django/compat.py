"""Django's Tasks framework, wherever it lives: `django.tasks` from Django 6 on, else the
`django-tasks` backport (module `django_tasks`, Django >= 4.2) by the framework's own author.
Both have the same API; only the exceptions were renamed when it moved into Django."""

from __future__ import annotations

try:
    from django.tasks import TaskContext, TaskResult, TaskResultStatus
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import Task, TaskError
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started

    FRAMEWORK = "django.tasks"
except ImportError:  # Django < 6: the backport
    from django_tasks import TaskContext, TaskResult, TaskResultStatus  # type: ignore[no-redef]
    from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef]
    from django_tasks.base import Task, TaskError  # type: ignore[no-redef]
    from django_tasks.exceptions import InvalidTaskError as InvalidTask  # type: ignore[no-redef]
    from django_tasks.exceptions import TaskResultDoesNotExist  # type: ignore[no-redef]
    from django_tasks.signals import task_enqueued, task_finished, task_started  # type: ignore[no-redef]

    FRAMEWORK = "django_tasks"

__all__ = ["FRAMEWORK", "BaseTaskBackend", "InvalidTask", "Task", "TaskContext", "TaskError", "TaskResult",
           "TaskResultDoesNotExist", "TaskResultStatus", "task_enqueued", "task_finished", "task_started"]
