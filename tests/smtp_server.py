#!/usr/bin/env python3
"""A real SMTP server for hookroute's tests, built on aiosmtpd (Debian: python3-aiosmtpd).

Saves every accepted message as JSON in --out: the envelope, whether the session used TLS and
AUTH, and the message parsed by Python's email package (headers, text and HTML parts, and
each attachment's name, type and bytes in base64).
Recipients at reject.invalid are refused with 550, like an unknown mailbox. Mode "echo" is a
careless relay: plain SMTP with AUTH, whose refusal quotes the AUTH PLAIN line it was sent.
Prints READY once it accepts connections.
"""
import argparse
import base64
import email
import email.policy
import json
import logging
import os
import signal
import ssl
import threading
import time
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class Saver:
    def __init__(self, out):
        self.out = out
        self.count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.endswith("@reject.invalid"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        parts = {}
        attachments = []
        for part in message.walk():
            if part.is_attachment():
                data = part.get_payload(decode=True) or b""
                attachments.append({
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "base64": base64.b64encode(data).decode("ascii"),
                })
            elif part.get_content_maintype() == "text":
                parts[part.get_content_type()] = part.get_content()
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": server.transport.get_extra_info("ssl_object") is not None,
            "authenticated": bool(session.authenticated),
            "headers": [[k, str(v)] for k, v in message.items()],
            "subject": str(message["subject"]),
            "text": parts.get("text/plain", ""),
            "html": parts.get("text/html", ""),
            "attachments": attachments,
            "raw": envelope.original_content.decode("utf-8", "replace"),
        }
        path = os.path.join(self.out, f"{time.time_ns()}-{self.count}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 Message accepted"


def main():
    # aiosmtpd warns about its own internals (Session.login_data); not ours to fix.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # The careless relay ("echo") means its AUTH without TLS; no need to say so.
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--mode", choices=["plain", "starttls", "tls", "echo"], default="plain")
    parser.add_argument("--auth", help="user:password required")
    args = parser.parse_args()

    context = None
    if args.mode in ("starttls", "tls"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    params = {}
    if args.mode == "starttls":
        params.update(tls_context=context, require_starttls=True)
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = auth_data.login.decode() == user and auth_data.password.decode() == password
            if not ok and args.mode == "echo":
                line = base64.b64encode(b"\0" + auth_data.login + b"\0" + auth_data.password)
                message = f"535 5.7.8 Authentication failed for AUTH PLAIN {line.decode()}"
                return AuthResult(success=False, handled=False, message=message)
            # handled=False: aiosmtpd answers (235 or 535) itself.
            return AuthResult(success=ok, handled=False)

        params.update(
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=args.mode != "echo",
        )
    controller = Controller(
        Saver(args.out),
        hostname="127.0.0.1",
        port=args.port,
        ssl_context=context if args.mode == "tls" else None,
        server_hostname="localhost",
        **params,
    )
    controller.start()
    print("READY", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
