"""The review loop's web side: a store of decisions, the queue, the app.

``mic-jax-review`` (:mod:`mic_jax.review`) is the program; the page's
HTML, CSS and JavaScript are package data under ``static/``.
"""
