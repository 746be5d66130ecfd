"""CPU proxy: small gated-FFN transformer with relu (see sparsejax.config.PROXY_SIZES)."""

from sparsejax.config import proxy_config


def get_config():
    return proxy_config("small", activation="relu")
