"""Where caches and trusted keys come from: `[tool.eulerbake]` in pyproject.toml, then the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from eulerbake.core.errors import EulerbakeError
from eulerbake.store.signing import SecretKey
from eulerbake.store.substituters import CacheSettings, DirectoryBackend, S3Backend, parse_url


def _pyproject(tmp_path: Path, body: str) -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n\n[tool.eulerbake]\n" + body)
    return tmp_path


def test_pyproject_then_environment(tmp_path: Path) -> None:
    key = SecretKey.generate("ci-1").public()
    root = _pyproject(tmp_path, f'substituters = ["s3://bucket/prefix?region=eu-west-1&priority=40", '
                                f'"file:///mnt/cache?priority=10"]\ntrusted-public-keys = ["{key}"]\n')
    settings = CacheSettings.load(root, environ={})
    caches = settings.caches()
    assert [c.url for c in caches] == ["file:///mnt/cache", "s3://bucket/prefix"]  # by priority
    assert caches[0].trusted == [key] and caches[0].require_signatures
    assert settings.push_cache().url == "s3://bucket/prefix"  # the first configured, not the first by priority
    s3 = caches[1].backend
    assert isinstance(s3, S3Backend) and s3.region == "eu-west-1" and s3.endpoint_url is None

    env = {"EULERBAKE_SUBSTITUTERS": "file:///srv/a  s3://b2/p?endpoint_url=http://127.0.0.1:9000",
           "EULERBAKE_TRUSTED_PUBLIC_KEYS": "", "EULERBAKE_REQUIRE_SIGNATURES": "0",
           "EULERBAKE_PUSH_TO": "file:///srv/a", "EULERBAKE_SIGNING_KEY_FILE": "/run/secrets/ci-1.secret"}
    overridden = CacheSettings.load(root, environ=env)
    assert overridden.substituters == ("file:///srv/a", "s3://b2/p?endpoint_url=http://127.0.0.1:9000")
    assert overridden.trusted_public_keys == () and not overridden.require_signatures
    assert overridden.push_cache().url == "file:///srv/a"
    assert overridden.signing_key_file == "/run/secrets/ci-1.secret"
    assert CacheSettings.load(root, environ={"EULERBAKE_SUBSTITUTERS": ""}).caches() == []  # caching off


def test_no_configuration_means_no_caches(tmp_path: Path) -> None:
    assert CacheSettings.load(tmp_path, environ={}).caches() == []
    with pytest.raises(EulerbakeError, match="no cache to push to"):
        CacheSettings.load(tmp_path, environ={}).push_cache()


@pytest.mark.parametrize(("body", "message"), [
    ('substituters = "file:///x"\n', "substituters must be a list of strings"),
    ("require-signatures = 'no'\n", "require-signatures must be true or false"),
    ("substituters = [\n", "cannot read"),
])
def test_bad_configuration_is_named(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(EulerbakeError, match=message):
        CacheSettings.load(_pyproject(tmp_path, body), environ={})


@pytest.mark.parametrize(("url", "message"), [
    ("http://example.org/cache", "unknown scheme 'http'"),
    ("file://relative/path", "absolute path"),
    ("s3://bucket/p?endpoint=http://x", "unknown parameter(s) endpoint"),
    ("file:///x?priority=high", "priority 'high' is not a number"),
    ("s3:///prefix", "no bucket"),
])
def test_bad_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(EulerbakeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_url(url)


def test_url_forms() -> None:
    backend, priority = parse_url("/mnt/cache")
    assert isinstance(backend, DirectoryBackend) and priority == 50
    s3, _ = parse_url("s3://bucket?anonymous=1&profile=ci")
    assert isinstance(s3, S3Backend) and s3.anonymous and s3.profile == "ci" and s3.url == "s3://bucket"
