"""Online serving: the ANN item index (``ann_index``) and the retrieval endpoint (``retriever``).

Plain Python, no Dagster: the serving process imports these without the asset graph. Nothing
is imported here so that ``import twotower_assets.serving.retriever`` does not pull in
LanceDB before it needs it.
"""
