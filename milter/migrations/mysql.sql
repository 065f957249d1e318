-- postern-milter DMARC report store, schema version 1 (MySQL / MariaDB).
CREATE TABLE IF NOT EXISTS dmarc_messages (
    uid VARCHAR(190) NOT NULL PRIMARY KEY,
    received BIGINT NOT NULL,
    policy_domain VARCHAR(190) NOT NULL,
    record MEDIUMTEXT NOT NULL,
    KEY dmarc_messages_domain (policy_domain, received)
) DEFAULT CHARSET = utf8mb4;
CREATE TABLE IF NOT EXISTS dmarc_report_state (
    policy_domain VARCHAR(190) NOT NULL PRIMARY KEY,
    last_end BIGINT NOT NULL
) DEFAULT CHARSET = utf8mb4;
CREATE TABLE IF NOT EXISTS dmarc_sent (
    report_id VARCHAR(190) NOT NULL,
    destination VARCHAR(190) NOT NULL,
    sent_at BIGINT NOT NULL,
    PRIMARY KEY (report_id, destination)
) DEFAULT CHARSET = utf8mb4;
