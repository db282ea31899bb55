"""Routes of the dashboard (on a tenant's host)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard import views

app_name = "dashboard"
urlpatterns = [
    path("", views.index, name="index"),
    path("devices/<str:logical_id>/", views.device, name="device"),
    path("events", views.events, name="events"),
    path("login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
]
