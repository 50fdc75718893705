"""What the test modules share, imported from here (conftest.py holds the fixtures only):
project copies (project), models the fixtures save (models), settings and rendered configs
without a build (stages), a running server (serving), and one client (client)."""
