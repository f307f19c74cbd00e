"""The installed version: from the package metadata (pip, the Debian package),
else FALLBACK (a source tree run without installing)."""

from importlib import metadata

DIST = "vhost-user-balloon"
FALLBACK = "0.1.0+unknown"      # keep its first part equal to pyproject.toml's version


def version():
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return FALLBACK
