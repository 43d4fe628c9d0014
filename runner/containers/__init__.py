"""Containers: plugins (containers/*.yaml), the Docker API calls, and the one launcher that runs a
plugin as a worker or a server and removes it after."""
