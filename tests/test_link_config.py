"""exchange.max_upload_rate / max_download_rate / max_upload_share and the slot limits:
bad values are config errors that name the key and the allowed forms."""

from __future__ import annotations

import pytest

from peerfed.config import parse_config
from peerfed.core import encodings
from peerfed.core.exchange_rules import upload_per_exchange, wire_length
from peerfed.core.rates import parse_rate, stretched_interval
from peerfed.errors import ConfigError


def exchange(**values: object) -> dict[str, object]:
    return {"exchange": values}


def test_defaults_are_unlimited_with_half_the_upload_for_exchanges() -> None:
    cfg = parse_config({}, base_dir=None)
    assert (cfg.exchange.max_upload_rate, cfg.exchange.max_download_rate, cfg.exchange.max_upload_share) == ("", "", 0.5)
    assert cfg.admission.max_connections_per_address >= 1 and cfg.admission.header_timeout > 0


@pytest.mark.parametrize("text", ["500kbit", "20Mbit", "1Gbit", "2.5MB", ""])
def test_rates_in_the_documented_forms_are_taken(text: str) -> None:
    cfg = parse_config(exchange(max_upload_rate=text, max_download_rate=text), base_dir=None).exchange
    assert cfg.max_upload_rate == text and cfg.max_download_rate == text


@pytest.mark.parametrize("key", ["max_upload_rate", "max_download_rate"])
@pytest.mark.parametrize("value", ["20mbit", "20 Mbps", "0kbit", "-1MB", 20, 2.5, True])
def test_a_bad_rate_names_the_key_and_the_allowed_forms(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(exchange(**{key: value}), base_dir=None)
    text = "\n".join(caught.value.args[1]) if len(caught.value.args) > 1 else str(caught.value)
    assert f"exchange.{key}:" in text
    assert '"500kbit", "20Mbit", "1Gbit", "2.5MB"' in text and '"" (unlimited)' in text


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, "0.5", True])
def test_a_bad_share_names_the_key_and_the_allowed_range(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(exchange(max_upload_share=value), base_dir=None)
    text = "\n".join(caught.value.args[1]) if len(caught.value.args) > 1 else str(caught.value)
    assert "exchange.max_upload_share:" in text and "0 < x <= 1" in text


def test_the_interval_is_stretched_to_keep_the_average_upload_below_the_share() -> None:
    # ResNet-18 (44.7 MB) on 20 Mbit/s with half of it for exchanges: a push and a reply per
    # interval take 2 x 44.7 MB / 1.25 MB/s = 71.5 s.
    rate = parse_rate("20Mbit")
    assert stretched_interval(10.0, 2 * 44.7e6, rate, 0.5) == pytest.approx(71.52)
    assert stretched_interval(10.0, 2 * 44.7e6, None, 0.5) == 10.0  # unlimited: as configured
    assert stretched_interval(10.0, 2 * 1e6, rate, 0.5) == 10.0  # a small model: no stretch needed


def test_the_stretch_counts_the_bytes_of_the_encoding_sent() -> None:
    numel = 11_689_512  # ResNet-18
    float32 = upload_per_exchange("float32", numel)
    assert float32 == 2 * wire_length(4 * numel)
    assert upload_per_exchange("auto", numel) == 2 * wire_length(encodings.wire_length("int8", numel))
    assert upload_per_exchange("bfloat16", numel) == 2 * wire_length(2 * numel)
    # "auto" sends int8: about a quarter of float32's bytes, so a quarter of the stretch
    rate = parse_rate("20Mbit")
    assert stretched_interval(10.0, upload_per_exchange("auto", numel), rate, 0.5) == pytest.approx(
        stretched_interval(10.0, float32, rate, 0.5) / 4, rel=0.01)
