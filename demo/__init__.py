"""The demo of the referrer portal: synthetic studies (``studies``), people and their local
identity provider (``people``), reports sent through the HL7 path (``reports``) and the
``flask --app app demo`` and ``demo-idp`` commands (``cli``).

Not part of the product: the wheel ships only ``portal``, and ``app.py`` registers these
commands only when ``PORTAL_ENV`` is ``development``.
"""
