"""The Dagster definitions, one folder per domain, loaded by ``dg.load_from_defs_folder``.

``source``      click events
``splits``      training / validation / test tables, their data checks, the training-input checks
``training``    tf datasets, the trained model (and the Pipes launcher for remote training)
``evaluation``  metrics against baselines, and the quality gate
``publishing``  the MatchModel, embedding tables, recommendations, similar items
``automation``  the training job, the weekly schedule, the automation sensor
``resources.py`` the warehouse, MLflow and artifact-store resources every asset shares

Asset modules share keys, tables and file layouts through ``twotower_assets.lib.layout``,
never by importing each other.
"""
