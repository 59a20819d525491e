"""Fast paths behind the :mod:`gmlp.nn` modules, each with the plain reference path it is tested against."""

from .toeplitz import toeplitz_mix_fft

__all__ = ["toeplitz_mix_fft"]
