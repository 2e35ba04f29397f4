"""`ten nginx` and `ten caddy`: print a working reverse-proxy configuration for tenement.

Both put the proxy at the edge (TLS, HTTP/2) and pass every request to tenement, which
routes it to the tenant's socket and wakes sleepers while the request is held. Tenants'
sockets live in folders only their own uid may open (README "Security"), so tenement is
the one process that reaches them. tenement must trust the proxy's headers:
TENEMENT_TRUSTED_PROXIES names its address (README "Behind nginx / Caddy").
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from instances.cli.client import CliError, Exit
from instances.ids import InvalidName
from routing.hosts import MalformedHost, normalize

if TYPE_CHECKING:
    from instances.cli.app import Verbs

NGINX = """\
# nginx in front of tenement, printed by `ten nginx`. Put it in
# /etc/nginx/conf.d/tenement.conf, then `nginx -t && systemctl reload nginx`.
# tenement must believe this proxy's X-Forwarded-* headers and know its domain:
#   TENEMENT_TRUSTED_PROXIES={trusted}  TENEMENT_DOMAIN={domain}
# nginx passes every request on; tenement routes it to the tenant and wakes sleepers
# while the request is held (up to the service's wake_timeout, then 503).

upstream tenement {{
    server {upstream};
    keepalive 32;
}}

map $http_upgrade $tenement_connection {{
    default upgrade;
    ''      '';
}}

server {{
    listen {listen} ssl;
    server_name {domain} *.{domain};
    ssl_certificate {cert};
    ssl_certificate_key {key};

    # tenement enforces its own limit (TENEMENT_MAX_BODY_MB) and streams bodies.
    client_max_body_size 0;
    proxy_request_buffering off;
    # Server-sent events, long polls and downloads stream through unbuffered.
    proxy_buffering off;

    location / {{
        proxy_pass http://tenement;
        proxy_http_version 1.1;
        # The Host the client sent, port included: tenement routes on it, and the
        # dashboard's CSRF check compares it with the browser's Origin.
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $tenement_connection;
        # A held request waits for its tenant to wake; WebSockets stay open.
        proxy_read_timeout 1h;
        proxy_send_timeout 1h;
    }}
}}
{redirect}"""

# --direct: tenants' requests go from nginx straight to their sockets. Before each one,
# auth_request asks tenement to wake the tenant if it sleeps (and counts it as activity,
# so a busy tenant is not stopped for idleness); the answer says where it listens. Any
# trouble (no such tenant, failed, the app gone since) is handed to tenement, whose
# answer is the clear one (404, 503 with the reason) or the response itself.
NGINX_DIRECT = """\
# nginx in front of tenement, serving tenants straight from their sockets; printed by
# `ten nginx --direct`. Put it in /etc/nginx/conf.d/tenement.conf, then
# `nginx -t && systemctl reload nginx`. tenement must trust this proxy and know its domain:
#   TENEMENT_TRUSTED_PROXIES={trusted}  TENEMENT_DOMAIN={domain}
# nginx's workers must be able to open the tenants' sockets: run the services it serves
# with `user = "<nginx's user>"` (e.g. www-data), since each tenant's socket folder
# belongs to the tenant's uid (0700). The path /_tenement_wake is nginx's own.

upstream tenement {{
    server {upstream};
    keepalive 32;
}}

map $http_upgrade $tenement_connection {{
    default upgrade;
    ''      '';
}}

# The control host (dashboard, API): through tenement.
server {{
    listen {listen} ssl;
    server_name {domain};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;

    location / {{
        proxy_pass http://tenement;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $tenement_connection;
        proxy_read_timeout 1h;
    }}
}}

# Tenants: straight to the socket, woken through tenement first.
server {{
    listen {listen} ssl;
    server_name *.{domain};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size {max_body};
    proxy_buffering off;

    location / {{
        auth_request /_tenement_wake;
        # unix:/path/app.sock: or 127.0.0.1:PORT, as tenement reached the app.
        auth_request_set $tenement_upstream $upstream_http_x_tenement_upstream;
        proxy_pass http://$tenement_upstream;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $tenement_connection;
        proxy_read_timeout {request_timeout};
        # 500: the wake said no (404, 503); 502: the app went away since. tenement answers.
        error_page 500 502 = @tenement;
    }}

    location = /_tenement_wake {{
        internal;
        proxy_pass http://tenement/_tenement/wake?host=$host;
        proxy_http_version 1.1;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header Connection "";
        proxy_set_header Host localhost;
        proxy_read_timeout 1h;  # a wake holds until ready or its wake_timeout
    }}

    location @tenement {{
        proxy_pass http://tenement;
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $tenement_connection;
        proxy_read_timeout 1h;
    }}
}}
{redirect}"""

NGINX_REDIRECT = """
server {{
    listen {http_listen};
    server_name {domain} *.{domain};
    return 301 https://$host$request_uri;
}}
"""

CADDY = """\
# Caddy in front of tenement, printed by `ten caddy`. Save it as /etc/caddy/Caddyfile,
# then `systemctl reload caddy`.
# tenement must believe this proxy's X-Forwarded-* headers and know its domain:
#   TENEMENT_TRUSTED_PROXIES={trusted}  TENEMENT_DOMAIN={domain}
# Certificates are issued on demand, only for names tenement says it serves (the
# control host and registered tenants: /_tenement/ask), so a wildcard DNS record
# pointing at this host cannot be used to make Caddy request certificates for others.
{{
{global_options}    on_demand_tls {{
        ask http://{upstream}/_tenement/ask
    }}
}}

https://{listen_host}{listen_port} {{
    tls{tls} {{
        on_demand
    }}
    # Caddy passes Host through and sets X-Forwarded-For/-Proto/-Host itself.
    reverse_proxy {upstream} {{
        # Requests held while their tenant wakes, and server-sent events, stream.
        flush_interval -1
    }}
}}
"""


def domain_of(text: str) -> str:
    try:
        host = normalize(text)
    except (MalformedHost, InvalidName):
        raise CliError(f"--domain {text!r}: not a host name", Exit.USAGE) from None
    return host


def nginx(args: argparse.Namespace) -> int:
    domain = domain_of(args.domain)
    redirect = ""
    if args.http_listen:
        redirect = NGINX_REDIRECT.format(http_listen=args.http_listen, domain=domain)
    template = NGINX_DIRECT if args.direct else NGINX
    print(
        template.format(
            max_body=args.max_body,
            request_timeout=args.request_timeout,
            domain=domain,
            upstream=args.upstream,
            trusted=trusted_of(args.upstream),
            listen=args.listen,
            cert=args.cert or f"/etc/letsencrypt/live/{domain}/fullchain.pem",
            key=args.key or f"/etc/letsencrypt/live/{domain}/privkey.pem",
            redirect=redirect,
        ),
        end="",
    )
    return Exit.OK


def caddy(args: argparse.Namespace) -> int:
    domain = domain_of(args.domain)
    port = args.listen if args.listen != "443" else ""
    global_options = ""
    if port:
        global_options += f"    https_port {port}\n"
    if args.internal_tls:
        # A local CA of Caddy's own (tests, private networks); no ACME account needed.
        global_options += "    local_certs\n"
    print(
        CADDY.format(
            domain=domain,
            upstream=args.upstream,
            trusted=trusted_of(args.upstream),
            global_options=global_options,
            listen_host="",
            listen_port=f":{port}" if port else "",
            tls=" internal" if args.internal_tls else f" {args.email}" if args.email else "",
        ),
        end="",
    )
    return Exit.OK


def trusted_of(upstream: str) -> str:
    """The address tenement sees the proxy connect from: loopback when it listens there."""
    host = upstream.rpartition(":")[0].strip("[]")
    return "::1" if host == "::1" else "127.0.0.1"


def add(verbs: Verbs) -> None:
    """Register `nginx` and `caddy`."""
    for name, run, summary in (
        ("nginx", nginx, "Print an nginx server block that puts nginx in front of tenement."),
        ("caddy", caddy, "Print a Caddyfile that puts Caddy in front of tenement."),
    ):
        parser = verbs.add(
            name,
            run,
            summary,
            "TLS ends at the proxy; tenement routes, wakes and forwards. Set\n"
            "TENEMENT_TRUSTED_PROXIES to the proxy's address (the config says which).",
        )
        parser.add_argument(
            "--domain", required=True, help="the control host; tenants are ID.SERVICE.DOMAIN"
        )
        parser.add_argument(
            "--upstream",
            default="127.0.0.1:8000",
            metavar="HOST:PORT",
            help="where tenement listens (runsupervisor --bind; default 127.0.0.1:8000)",
        )
        parser.add_argument("--listen", default="443", metavar="PORT", help="HTTPS port")
        if name == "nginx":
            parser.add_argument("--cert", metavar="FILE", help="TLS certificate chain (PEM)")
            parser.add_argument("--key", metavar="FILE", help="its private key (PEM)")
            parser.add_argument(
                "--direct",
                action="store_true",
                help="serve tenants straight from their sockets, woken through tenement "
                "(their services need `user` set to nginx's user)",
            )
            parser.add_argument(
                "--max-body", default="100m", help="--direct: client_max_body_size (100m)"
            )
            parser.add_argument(
                "--request-timeout", default="30s", help="--direct: proxy_read_timeout (30s)"
            )
            parser.add_argument(
                "--http-listen",
                default="80",
                metavar="PORT",
                help="plain-HTTP port that redirects to https ('' for none)",
            )
        else:
            parser.add_argument("--email", help="ACME account e-mail (default: none)")
            parser.add_argument(
                "--internal-tls",
                action="store_true",
                help="certificates from Caddy's own local CA instead of ACME",
            )
