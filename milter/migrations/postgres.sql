-- postern-milter DMARC report store, schema version 1 (PostgreSQL).
CREATE TABLE IF NOT EXISTS dmarc_messages (
    uid VARCHAR(190) NOT NULL PRIMARY KEY,
    received BIGINT NOT NULL,
    policy_domain VARCHAR(255) NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dmarc_messages_domain ON dmarc_messages (policy_domain, received);
CREATE TABLE IF NOT EXISTS dmarc_report_state (
    policy_domain VARCHAR(255) NOT NULL PRIMARY KEY,
    last_end BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS dmarc_sent (
    report_id VARCHAR(190) NOT NULL,
    destination VARCHAR(190) NOT NULL,
    sent_at BIGINT NOT NULL,
    PRIMARY KEY (report_id, destination)
);
