"""`LabelStudioAPI.authorised`, the one place a request retries with a fresh access token."""

from __future__ import annotations

import io

import pytest
import requests

from sdk.labelstudio import LabelStudioAPI


def response(status: int) -> requests.Response:
    resp = requests.Response()
    resp.status_code, resp.raw = status, io.BytesIO(b"")
    return resp


@pytest.fixture
def personal(monkeypatch: pytest.MonkeyPatch) -> LabelStudioAPI:
    api = LabelStudioAPI("http://ls.invalid", "header.payload.signature")  # a JWT: a personal access token
    tokens = iter(["first", "second"])
    monkeypatch.setattr(api, "_exchange_token", lambda: next(tokens))
    return api


def test_an_expired_access_token_is_exchanged_once_more(personal: LabelStudioAPI) -> None:
    sent: list[dict] = []

    def send(headers: dict) -> requests.Response:
        sent.append(headers)
        return response(401 if len(sent) == 1 else 200)

    assert personal.authorised(send).status_code == 200
    assert sent == [{"Authorization": "Bearer first"}, {"Authorization": "Bearer second"}]


def test_a_second_refusal_is_returned_not_retried_again(personal: LabelStudioAPI) -> None:
    sent: list[dict] = []
    assert personal.authorised(lambda headers: sent.append(headers) or response(401)).status_code == 401
    assert len(sent) == 2


def test_a_legacy_token_is_not_retried() -> None:
    api = LabelStudioAPI("http://ls.invalid", "0123456789abcdef")
    sent: list[dict] = []
    assert api.authorised(lambda headers: sent.append(headers) or response(401)).status_code == 401
    assert sent == [{"Authorization": "Token 0123456789abcdef"}]
