"""Local tooling, behind the ``local`` extra: a moto S3 endpoint on 127.0.0.1
(``s3server``), drawn demo data (``synth``) and ``dragons demo``. Nothing on a
cluster node imports these.
"""
