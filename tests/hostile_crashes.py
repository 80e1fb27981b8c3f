"""A corpus of hostile crash texts: what another process might write into a crash file.

``SECRETS`` are the strings none of which may leave the device (P12); ``TEXTS`` place
them everywhere a crash text has room: the exception message, source lines, frame
paths, function names, gdb arguments, the signature, and JSON crash files.
"""

from __future__ import annotations

import json
from typing import Final

SERIAL: Final = "SN-1"  # the serial of tests.device.helpers.Rig's device

SECRETS: Final = (
    # coordinates
    "48.137154",
    "11.575382",
    "137154",
    # credentials and keys
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI",
    "bPxRfiCYEXAMPLEKEY",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "s3cr3t-Tok",
    # Wi-Fi secrets
    "hunter22",
    "correct-horse",
    "SuperSecretWifi",
    # paths outside the software
    "/root",
    "/media",
    "usb0",
    "alice",
    "Documents",
    # e-mail addresses in several scripts
    "jürgen.müller",
    "example.de",
    "δοκιμή",
    "用户",
    "bob@example.com",
    # phone numbers
    "1234567",
    "4915112345678",
    "555-0199",
    # MAC addresses
    "00:1A:2B:3C:4D:5E",
    "00-1a-2b-3c-4d-5f",
    "001a.2b3c.4d60",
    # the serial
    SERIAL,
)

_MESSAGE: Final = (
    "AKIAIOSFODNN7EXAMPLE aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
    "psk=hunter22 passphrase=correct-horse wpa_passphrase SuperSecretWifi "
    "token: ghp_16C7e42F292c6912E7710c838347Ae178B4a password='s3cr3t-Tok' "
    "mail jürgen.müller@example.de δοκιμή@παράδειγμα.δοκιμή 用户@例子.广告 bob@example.com "
    "phone +49 89 1234567 or 004915112345678 or (555) 555-0199 "
    "mac 00:1A:2B:3C:4D:5E 00-1a-2b-3c-4d-5f 001a.2b3c.4d60 serial SN-1 "
    "at 48.137154,11.575382 file /root/.ssh/id_rsa /media/usb0/x C:\\Users\\alice\\Documents\\x"
)
_PEM: Final = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
)

PYTHON: Final = f"""Traceback (most recent call last):
  File "/root/secret/app.py", line 12, in <module>
    connect(lat=48.137154, lon=11.575382, psk="hunter22")
  File "/media/usb0/creds.py", line 3, in connect
    key = "{_PEM}"
  File "/home/alice/Documents/jürgen.müller@example.de/x.py", line 9, in AKIAIOSFODNN7EXAMPLE
  File "/usr/lib/python3/dist-packages/miio/fan.py", line 42, in on_tick_4915112345678
  File "/usr/lib/python3/dist-packages/miio/SN-1/fan.py", line 43, in handle_SN_1
  File "/usr/lib/python3/dist-packages/miio/fan.py", line 44, in spin
ValueError: {_MESSAGE}
"""

GDB: Final = f"""Program received signal SIGSEGV, Segmentation fault.
#0  0x00007f3a in parse_ssid (psk=0x55 "hunter22", mac="00:1A:2B:3C:4D:5E") at /home/alice/wifi.c:88
#1  0x00007f3b in AKIAIOSFODNN7EXAMPLE () at /media/usb0/k.c:3
#2  0x00007f3c in main (argc=2, argv=0x7ffd) at /root/secret/main.c:12
{_MESSAGE}
"""

SIGNATURE: Final = f"48.137154,11.575382 {_MESSAGE}"

TEXTS: Final = {
    "python traceback": PYTHON,
    "gdb backtrace": GDB,
    "message only": _MESSAGE + "\n" + _PEM,
    "json file": json.dumps({"signature": SIGNATURE, "stack": PYTHON, "uptime_s": 3}),
    "json with hostile signature": json.dumps({"signature": _MESSAGE, "stack": GDB}),
}


def leaked(payload: bytes) -> list[str]:
    """The secrets found in a payload as it left the device (any case, JSON-escaped or not)."""
    text = payload.decode()
    plain = json.loads(text) if text.lstrip().startswith("{") else text
    haystacks = (text.lower(), json.dumps(plain, ensure_ascii=False).lower())
    return [s for s in SECRETS if any(s.lower() in h for h in haystacks)]
