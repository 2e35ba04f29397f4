"""The REST API (Django REST framework), served on the control host under /api/."""
