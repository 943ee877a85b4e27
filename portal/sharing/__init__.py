"""Time-limited share links for patients and colleagues (docs/security.md 13-22, design 3.3).

``tokens`` makes and hashes secrets, ``service`` creates, exchanges and revokes links,
``sessions`` turns a share cookie into a principal, ``delivery`` sends links (e-mail, SMS, QR),
``routes`` holds the landing page, the patient's pages and the sender's pages.
"""
