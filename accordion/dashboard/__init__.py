"""The live memory page's static files, served at /dashboard/ by api/stats_routes.py."""
