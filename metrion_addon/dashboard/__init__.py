"""The web dashboard over the request log: Starlette views, Jinja2 templates, a vendored Chart.js.

Read-only: it opens the database read-only and never talks to the proxy.
"""
