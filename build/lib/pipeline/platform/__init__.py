"""The platform on one machine: which services `loraflow up` starts and how (services.py), and a small
supervisor that starts, health-checks, lists and stops them by PID (supervisor.py). Compose runs the same
service commands (`loraflow service <name>`), so both start each service one way."""
