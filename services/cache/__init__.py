"""The latent cache: the on-storage contract between the encode job and the train job.

Submodules are imported directly (`services.cache.reader` pulls in torch; `status` must not).
"""
