"""One ACME order, start to finish, with the `acme` package (RFC 8555).

Blocking (the package speaks HTTP through `requests`): the manager runs each order in a
worker thread. HTTP-01 answers are published in `tokens`, a dict the plain-HTTP
listener reads (proxy/tls/challenge.py); DNS-01 TXT records go through the operator's
`dns_hook` command.
"""

from __future__ import annotations

import datetime
import logging
import subprocess
import threading

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization

from proxy.tls.config import TlsConfig
from proxy.tls.store import CertStore, StoredCert, new_key_pem

log = logging.getLogger("tenement.tls")

ORDER_TIMEOUT = 90.0  # seconds for the CA to validate and sign, once challenges are up
NETWORK_TIMEOUT = 15  # seconds for any one request to the CA
HOOK_TIMEOUT = 60.0  # seconds for the dns_hook to publish or remove a record


class OrderFailed(Exception):
    """The CA refused or could not be reached; the message says which and why."""


class Issuer:
    def __init__(self, config: TlsConfig, store: CertStore, tokens: dict[str, str]) -> None:
        self.config = config
        self.store = store
        self.tokens = tokens
        self._client: client.ClientV2 | None = None
        self._lock = threading.Lock()  # one account registration, however many orders

    def issue(self, names: tuple[str, ...]) -> StoredCert:
        """Order a certificate for `names`, store it, and return it. Raises OrderFailed."""
        try:
            acme = self.client()
            key_pem = new_key_pem()
            order = acme.new_order(crypto_util.make_csr(key_pem, list(names)))
            order = self.validate(acme, order)
        except errors.Error as e:
            raise OrderFailed(f"ACME: {e}") from None
        except messages.Error as e:
            raise OrderFailed(f"the CA refused: {e.detail or e.typ}") from None
        except OSError as e:  # requests' ConnectionError and timeouts are OSErrors
            raise OrderFailed(f"cannot reach the CA at {self.config.directory_url}: {e}") from None
        return self.store.save(names, order.fullchain_pem.encode(), key_pem)

    def validate(
        self, acme: client.ClientV2, order: messages.OrderResource
    ) -> messages.OrderResource:
        """Answer every pending authorization, then wait for the certificate."""
        cleanups = []
        try:
            for authz in order.authorizations:
                if authz.body.status != messages.STATUS_VALID:
                    cleanups.append(self.answer(acme, authz))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            return acme.poll_and_finalize(order, deadline)
        finally:
            for cleanup in cleanups:
                cleanup()

    def answer(self, acme: client.ClientV2, authz: messages.AuthorizationResource):
        """Publish the answer to one authorization's challenge; returns its clean-up."""
        domain = authz.body.identifier.value
        wanted = challenges.DNS01 if authz.body.wildcard else challenges.HTTP01
        challb = next((c for c in authz.body.challenges if isinstance(c.chall, wanted)), None)
        if challb is None:
            raise OrderFailed(f"the CA offers no {wanted.typ} challenge for {domain}")
        response, validation = challb.response_and_validation(acme.net.key)
        if isinstance(challb.chall, challenges.HTTP01):
            token = challb.chall.encode("token")
            self.tokens[token] = validation
            acme.answer_challenge(challb, response)
            return lambda: self.tokens.pop(token, None)
        record = challb.chall.validation_domain_name(domain)
        self.hook("present", record, validation)
        acme.answer_challenge(challb, response)
        return lambda: self.hook("cleanup", record, validation, check=False)

    def hook(self, action: str, record: str, value: str, check: bool = True) -> None:
        argv = [*self.config.dns_hook, action, record, value]
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=HOOK_TIMEOUT,
                start_new_session=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OrderFailed(f"dns_hook {action} {record}: {e}") from None
        if done.returncode != 0:
            message = (
                f"dns_hook {action} {record} exited {done.returncode}: {done.stderr.strip()[-300:]}"
            )
            if check:
                raise OrderFailed(message)
            log.warning("%s", message)

    # ---- the account -----------------------------------------------------------------

    def client(self) -> client.ClientV2:
        with self._lock:
            if self._client is None:
                self._client = self.register()
            return self._client

    def register(self) -> client.ClientV2:
        """The account key from the cache; the account itself registered once per CA."""
        key = serialization.load_pem_private_key(self.store.account_key(), password=None)
        net = client.ClientNetwork(
            jose.JWKEC(key=key), alg=jose.ES256, user_agent="tenement", timeout=NETWORK_TIMEOUT
        )
        url = self.config.directory_url
        acme = client.ClientV2(client.ClientV2.get_directory(url, net), net)
        registration = messages.NewRegistration.from_data(
            email=self.config.email or None, terms_of_service_agreed=True
        )
        try:
            regr = acme.new_account(registration)
        except errors.ConflictError as e:  # this key has an account there already
            regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            net.account = regr
        if self.store.account(url) != regr.uri:
            self.store.save_account(url, regr.uri)
            log.info("ACME account %s at %s", regr.uri, url, extra={"event": "acme_account"})
        return acme

    def forget_client(self) -> None:
        """After a network failure: fetch the directory (and nonces) afresh next time."""
        with self._lock:
            self._client = None
