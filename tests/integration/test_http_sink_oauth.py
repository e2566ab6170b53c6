"""OAuth2 client credentials: the token is fetched once, cached, and when it expires mid-run it is refreshed
exactly once (however many requests were rejected with it), each rejected request is resent once, and no
message is lost or applied twice."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from hl7bridge.crm.http import open_http_sink
from hl7bridge.crm.http_auth import OAuth2ClientCredentials
from hl7bridge.errors import TransientSinkError
from tests.crmserver import CrmServer, Logged, sink_config
from tests.integration.test_http_sink_golive import PRESETS, mapped
from tests.messages import adt

N = 120
EXPIRE_AFTER = 40
AUTH = {"kind": "oauth2_client_credentials", "token_url": "/services/oauth2/token", "client_id": "hl7bridge",
        "secret_env": "HL7_TEST_CLIENT_SECRET", "scope": "api"}


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("HL7_TEST_CLIENT_SECRET", "s3cret-value")
    yield "s3cret-value"


def _writes(preset: str, log: list[Logged]) -> Counter[str]:
    """Successful writes per MRN."""
    out: Counter[str] = Counter()
    for e in log:
        if not 200 <= e.status < 300:
            continue
        if preset == "salesforce" and e.method == "PATCH":
            out[e.path.rsplit("/", 1)[1]] += 1
        elif preset == "hubspot" and e.path.endswith("/batch/upsert"):
            out.update(i["id"] for i in e.body["inputs"])
        elif preset == "generic" and e.method == "PUT":
            out[e.path.rsplit("/", 1)[1]] += 1
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_a_token_expiring_mid_run_is_refreshed_exactly_once(secret: str, preset: str) -> None:
    with CrmServer(auth=("oauth2", "hl7bridge", secret)) as server:
        sink = open_http_sink(sink_config(preset, server.base_url, auth=AUTH))
        applied = 0
        lock = threading.Lock()

        def one(i: int) -> str:
            nonlocal applied
            outcome = sink.apply(mapped(adt("A04", mrn=f"OA{i:03d}", family=f"Fam{i}")))[0].outcome
            with lock:
                applied += 1
                if applied == EXPIRE_AFTER:
                    server.expire_tokens()  # while other workers have requests in flight
            return outcome

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(N)))
        auth = sink.client.auth
        assert isinstance(auth, OAuth2ClientCredentials)
        assert server.tokens_issued == 2 and auth.fetches == 2  # the first token, and one refresh
        token_posts = [e for e in server.log if e.path == "/services/oauth2/token"]
        assert [e.body["grant_type"] for e in token_posts] == ["client_credentials"] * 2
        rejected = [e for e in server.log if e.status == 401]
        assert rejected, "the expiry never hit a request"
        assert outcomes == ["created"] * N  # nothing lost: every rejected request was resent and applied
        assert sorted(c.mrn for c in sink.contacts()) == [f"OA{i:03d}" for i in range(N)]
        assert set(_writes(preset, server.log).values()) == {1}  # nothing applied twice
        assert secret not in repr(auth.__dict__)
        sink.close()


def test_refused_client_credentials_are_transient_and_name_no_secret(secret: str) -> None:
    with CrmServer(auth=("oauth2", "hl7bridge", "another-secret")) as server:
        sink = open_http_sink(sink_config("salesforce", server.base_url, auth=AUTH))
        with pytest.raises(TransientSinkError, match="refused the client credentials") as err:
            sink.apply(mapped(adt("A04", mrn="OAX")))
        assert secret not in str(err.value)
        with pytest.raises(TransientSinkError):
            sink.ping()
        sink.close()
