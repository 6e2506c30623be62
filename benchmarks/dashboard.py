"""Dashboard benchmark: the worklist and study-view service calls on 100,000 studies in PostgreSQL.

Starts a throwaway PostgreSQL (the ``pgserver`` wheel, via tests/servers.py), migrates it with
Alembic, seeds it in bulk with SQL (100,000 studies with a series and an instance each, 130,000
predictions from two model versions, 10,000 review labels), then times the calls behind the
pages, the median of several runs each:

- ``worklist_first_page``: triage order, 50 rows, with the total count (what the page shows first)
- ``worklist_filtered``: scored CT studies not yet reviewed, by the champion, 50 rows + count
- ``worklist_page_500``: the 500th page of 50 in triage order
- ``worklist_search``: an accession prefix
- ``study_view``: ``view_study`` for one study (details, series, prediction history, audit event)

Target: < 300 ms each. Run: ``.venv/bin/python benchmarks/dashboard.py [--studies N]``.
The last line is one JSON object whose keys end in ``_ms``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import PostgresServer

from radflow.db import make_engine, make_sessionmaker
from radflow.services.study_view import view_study
from radflow.services.users import Principal, Role
from radflow.services.worklist import WorklistFilter, list_studies

PAGE = 50

SEED = """
INSERT INTO patient (id, pseudonym, created_at)
SELECT g, 'PSN' || lpad(g::text, 7, '0'), now() FROM generate_series(1, :patients) g;

INSERT INTO model_version (id, task, version, status, weights_key, config, metrics, threshold,
                           code_version, created_at)
VALUES (1, 'pneumonia-cxr', 1, 'retired', 'models/pneumonia-cxr/v1/model.pt', '{}', '{}', 0.5,
        'bench', now() - interval '30 days'),
       (2, 'pneumonia-cxr', 2, 'champion', 'models/pneumonia-cxr/v2/model.pt', '{}', '{}', 0.6,
        'bench', now() - interval '1 day');

INSERT INTO study (id, study_uid, patient_id, accession_number, study_date, description, modality,
                   status, status_reason, received_at, last_instance_at, updated_at, triage_rank)
SELECT g, '1.2.826.0.1.3680043.10.' || g, 1 + (g % :patients), 'A' || lpad(g::text, 9, '0'),
       '20240101', 'CHEST', (ARRAY['CR', 'DX', 'CT', 'MR'])[1 + g % 4],
       CASE WHEN g % 20 = 0 THEN 'stable' WHEN g % 50 = 1 THEN 'failed'
            WHEN g % 50 = 2 THEN 'no_model' ELSE 'scored' END,
       CASE WHEN g % 50 = 1 THEN 'preprocessing: no pixel data'
            WHEN g % 50 = 2 THEN 'no model applies' END,
       now() - make_interval(secs => (:studies - g) * 30),
       now() - make_interval(secs => (:studies - g) * 30), now(), 2
FROM generate_series(1, :studies) g;

INSERT INTO series (id, series_uid, study_id, modality, number, description)
SELECT g, '1.2.826.0.1.3680043.11.' || g, g, (ARRAY['CR', 'DX', 'CT', 'MR'])[1 + g % 4], 1, 'S'
FROM generate_series(1, :studies) g;

INSERT INTO instance (id, sop_instance_uid, sop_class_uid, series_id, number, object_key,
                      size_bytes, sha256, transfer_syntax_uid, rows, columns, frames, received_at)
SELECT g, '1.2.826.0.1.3680043.12.' || g, '1.2.840.10008.5.1.4.1.1.1', g, 1,
       'originals/x/' || g || '.dcm', 200000, md5(g::text) || md5(g::text), '1.2.840.10008.1.2.1',
       512, 512, 1, now() - make_interval(secs => (:studies - g) * 30)
FROM generate_series(1, :studies) g;

-- Older model v1 scored the first 30 % (history); champion v2 scored every "scored" study.
INSERT INTO prediction (study_id, model_version_id, task, score, scores, derived_keys, latency_ms,
                        created_at)
SELECT g, 1, 'pneumonia-cxr', random(), '{}', '{}', 10, now() - interval '20 days'
FROM generate_series(1, :studies * 3 / 10) g;
INSERT INTO prediction (study_id, model_version_id, task, score, scores, derived_keys, latency_ms,
                        created_at)
SELECT id, 2, 'pneumonia-cxr', random(), '{}', '{}', 10, now()
FROM study WHERE status = 'scored';

UPDATE study s SET latest_prediction_id = p.id,
       triage_rank = CASE WHEN p.score >= m.threshold THEN 0 ELSE 1 END
FROM (SELECT study_id, max(id) AS id FROM prediction GROUP BY study_id) latest
JOIN prediction p ON p.id = latest.id
JOIN model_version m ON m.id = p.model_version_id
WHERE s.id = latest.study_id;

-- A tenth of the scored studies reviewed.
INSERT INTO label (study_id, task, value, source, author, created_at)
SELECT id, 'pneumonia-cxr', 'normal', 'review', 'rita', now()
FROM study WHERE status = 'scored' AND id % 10 = 3;
UPDATE study SET status = 'reviewed' WHERE id % 10 = 3 AND status = 'scored'
"""


def seed(url: str, studies: int) -> float:
    started = time.perf_counter()
    engine = make_engine(url)
    with engine.begin() as connection:
        for statement in filter(str.strip, SEED.split(";\n")):
            connection.execute(
                text(statement), {"studies": studies, "patients": max(1, studies // 2)}
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        # Rows were inserted with explicit ids: move the sequences past them.
        for table in ("patient", "study", "series", "instance"):
            connection.execute(
                text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
            )
        connection.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def median_ms(call: Callable[[], object], runs: int) -> float:
    call()  # warm: the first call pays for connection setup and plan caching
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    with PostgresServer.start() as pg:
        url = pg.fresh_database()
        seconds = seed(url, args.studies)
        print(f"seeded {args.studies} studies in {seconds:.1f} s", flush=True)
        engine = make_engine(url)
        factory = make_sessionmaker(engine)
        user = Principal("bench-radiologist", Role.RADIOLOGIST)
        filtered = WorklistFilter(
            status="scored", modality="CT", reviewed=False, model_version_id=2
        )
        last_page = min(500, max(1, args.studies // PAGE))
        target_uid = f"1.2.826.0.1.3680043.10.{args.studies // 7 + 1}"

        def worklist(**kwargs: object) -> Callable[[], object]:
            def call() -> object:
                with factory() as session:
                    rows, total = list_studies(session, limit=PAGE, **kwargs)  # type: ignore[arg-type]
                    assert rows and total != 0
                    return rows

            return call

        def study() -> object:
            with factory() as session:
                view = view_study(session, user, target_uid)
                session.rollback()  # keep the audit table as seeded between runs
                return view

        results = {
            "worklist_first_page_ms": median_ms(worklist(), args.runs),
            "worklist_filtered_ms": median_ms(worklist(where=filtered), args.runs),
            "worklist_page_500_ms": median_ms(
                worklist(offset=(last_page - 1) * PAGE, count=False), args.runs
            ),
            "worklist_search_ms": median_ms(
                worklist(where=WorklistFilter(search="A00000123")), args.runs
            ),
            "study_view_ms": median_ms(study, args.runs),
        }
        engine.dispose()
    for name, value in results.items():
        verdict = "ok" if value < 300 else "OVER the 300 ms target"
        print(f"{name[:-3]:>22}: {value:8.1f} ms  {verdict}")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
