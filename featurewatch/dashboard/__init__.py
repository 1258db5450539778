"""The web dashboard: fleet overview, drift, features, the trigger timeline and a SQL
console over the catalog's readers' copy (app.py), with login tokens and roles (auth.py)
and charts drawn by plotly (charts.py).

May import: storage/, config, errors only: it reads files in the home and never joins the
Ray cluster.
"""
