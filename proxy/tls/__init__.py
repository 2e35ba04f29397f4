"""HTTPS for the control host, every tenant host and tenants' own domains (built-in ACME).

- config.py: `[settings.tls]` (upstream's keys and ours), checked and resolved;
- store.py: the cache directory: account key and certificates, 0700, written atomically;
- issuer.py: one ACME order (HTTP-01 or DNS-01) with the `acme` package, in a thread;
- manager.py: which certificate serves which name, on-demand issuance, renewal, status;
- listener.py: the HTTPS listener: the ClientHello's SNI is read before the handshake, so
  a name without a certificate can wait for one without blocking the event loop;
- challenge.py: the plain-HTTP side: ACME HTTP-01 answers and the redirect to HTTPS.
"""
