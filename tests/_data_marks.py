"""Skip marker for tests that read the real data sets (../shared/data or $NFT_DATA_DIR)."""

import pytest

from nft_lit.data import resolve_data_dir


def _has_data() -> bool:
    try:
        resolve_data_dir(None)
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _has_data(), reason="no data directory (set NFT_DATA_DIR)")
