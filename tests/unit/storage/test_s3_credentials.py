"""S3 settings from env and from a mounted Kubernetes Secret directory; secrets never shown."""

import pytest

from app.storage import StorageError
from app.storage.credentials import load_settings


def test_env_keys_and_endpoint_scheme_decide_tls():
    s = load_settings({"S3_ENDPOINT_URL": "https://s3.example:9000/", "AWS_ACCESS_KEY_ID": "ak",
                       "AWS_SECRET_ACCESS_KEY": "sk-value"})
    assert (s.host, s.secure, s.verify_tls, s.create_bucket) == ("s3.example:9000", True, True, False)
    assert "sk-value" not in repr(s) and "ak" not in repr(s).replace("access", "")
    s = load_settings({"S3_ENDPOINT_URL": "http://h:1", "AWS_ACCESS_KEY_ID": "a",
                       "AWS_SECRET_ACCESS_KEY": "b", "S3_VERIFY_TLS": "false", "S3_CREATE_BUCKET": "1"})
    assert (s.secure, s.verify_tls, s.create_bucket) == (False, False, True)


@pytest.mark.parametrize("names", [("accessKey", "secretKey"),
                                   ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")])
def test_keys_from_mounted_secret_dir(tmp_path, names):
    (tmp_path / names[0]).write_text("the-access\n")
    (tmp_path / names[1]).write_text("the-secret\n")
    s = load_settings({"S3_ENDPOINT_URL": "http://h:1", "S3_CREDENTIALS_DIR": str(tmp_path)})
    assert (s.access_key, s.secret_key) == ("the-access", "the-secret")
    assert str(tmp_path) in s.source and "the-secret" not in repr(s)


@pytest.mark.parametrize("env, match", [
    ({}, "S3_ENDPOINT_URL is not set"),
    ({"S3_ENDPOINT_URL": "minio:9000"}, "expected http://host:port"),
    ({"S3_ENDPOINT_URL": "http://h:1/path"}, "must not contain a path"),
    ({"S3_ENDPOINT_URL": "http://h:1"}, "no S3 credentials"),
    ({"S3_ENDPOINT_URL": "http://h:1", "S3_CREDENTIALS_DIR": "/nonexistent-dir"}, "not a directory"),
])
def test_bad_settings_are_one_line_errors(env, match):
    with pytest.raises(StorageError, match=match) as err:
        load_settings(env)
    assert "\n" not in str(err.value)


def test_incomplete_secret_dir_names_the_expected_files(tmp_path):
    (tmp_path / "accessKey").write_text("a")
    with pytest.raises(StorageError, match="needs files accessKey and secretKey"):
        load_settings({"S3_ENDPOINT_URL": "http://h:1", "S3_CREDENTIALS_DIR": str(tmp_path)})
